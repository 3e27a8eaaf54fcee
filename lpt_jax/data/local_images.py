"""Where the listed images of a local `data.root` really are.

Every image of a split list or a class-folder tree must be readable under data.root and
nowhere else: its real path (symlinks resolved, of the file and of each folder on its way)
stays inside the real path of data.root, and it is a regular file (a FIFO or a device given
to tf.data would block its reader forever or never end). `RootCheck(root).problem(rel)` says
why an image is not ('' if it is), for the list reader and the tree walk to refuse it in one
line naming the list line or the file, before training starts.

Cost: one lstat per image, plus one realpath per distinct folder and per image that is a
symlink (about 3 s per million images on a local disk with warm caches). A missing image
passes: the read says so (or skips it, data.corrupt_images='skip'). A remote root (gs://) has
neither symlinks nor special files: nothing is checked there.
"""

import os
import stat

from lpt_jax.storage import files

FIX_OUTSIDE = ("every image must lie under data.root: copy it there, or point data.root at "
               "a folder that holds all images")
FIX_SPECIAL = "replace it with the image file, or remove it"


class RootCheck:
    """Checks image paths relative to one root (folders' real paths are cached)."""

    def __init__(self, root: str):
        self.active = bool(root) and not files.is_remote(root)
        self.real_root = os.path.realpath(root) if self.active else ""
        self._prefix = self.real_root.rstrip(os.sep) + os.sep
        self._folders: dict = {}

    def _inside(self, real: str) -> bool:
        return real == self.real_root or real.startswith(self._prefix)

    def problem(self, rel: str) -> str:
        """Why the image at `rel` (relative to the root) may not be read ('' if it may), worded
        to follow the image's name: 'is a FIFO ...; <what to do>'."""
        if not self.active:
            return ""
        folder, name = os.path.split(rel)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = os.path.realpath(os.path.join(self.real_root, folder))
            self._folders[folder] = real_folder
        path = os.path.join(real_folder, name)
        if not self._inside(real_folder):
            return (f"leads out of data.root ({self.real_root}) through a symlinked folder: its "
                    f"real path is {path}; {FIX_OUTSIDE}")
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return ""
        if stat.S_ISLNK(mode):
            real = os.path.realpath(path)
            if not self._inside(real):
                return (f"is a symlink to {real}, outside data.root ({self.real_root}); "
                        f"{FIX_OUTSIDE}")
            try:
                mode = os.stat(real).st_mode
            except OSError:  # dangling: the read says so
                return ""
        if stat.S_ISREG(mode):
            return ""
        what = "a folder" if stat.S_ISDIR(mode) else files.kind_of(mode)
        return f"is {what}, not an image file; {FIX_SPECIAL}"
