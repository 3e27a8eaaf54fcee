"""Where the listed images of a local `data.root` really are.

Every image of a split list or a class-folder tree must be readable under data.root and
nowhere else: its real path (symlinks resolved, of the file and of each folder on its way)
stays inside the real path of data.root, and it is a regular file (a FIFO or a device given
to tf.data would block its reader forever or never end). `RootCheck(root).problem(rel)` says
why an image is not ('' if it is), for the list reader and the tree walk to refuse it in one
line naming the list line or the file, before training starts.

Cost (local disk, warm caches, 2 busy cores): a split list, one lstat per line plus a
realpath per distinct folder and per image that is a symlink, about 3 us a line (the
62,500-line Places-LT train list: 0.06 -> 0.25 s; a realpath per line would take 0.63 s); a
class-folder tree, one more listing of each class folder (`first_problem`) and an lstat only
for what that does not show as a regular file (62,500 images: 0.04 -> 0.07 s). A missing image
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

    def _real(self, folder: str) -> str:
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = os.path.realpath(os.path.join(self.real_root, folder))
            self._folders[folder] = real_folder
        return real_folder

    def first_problem(self, folder: str, names) -> tuple:
        """(name, problem) of the first of the files `names` in `folder` (relative to the
        root) that has one, ('', '') if none. One listing of the folder instead of a stat per
        file: an entry the listing shows as a regular file (not a symlink) is one."""
        if not self.active or not names:
            return "", ""
        real_folder = self._real(folder)
        regular = set()
        if self._inside(real_folder):
            try:
                with os.scandir(real_folder) as entries:
                    regular = {e.name for e in entries if e.is_file(follow_symlinks=False)}
            except OSError:
                pass
        for name in names:
            if name not in regular:
                problem = self.problem(os.path.join(folder, name))
                if problem:
                    return name, problem
        return "", ""

    def problem(self, rel: str) -> str:
        """Why the image at `rel` (relative to the root) may not be read ('' if it may), worded
        to follow the image's name: 'is a FIFO ...; <what to do>'."""
        if not self.active:
            return ""
        folder, name = os.path.split(rel)
        real_folder = self._real(folder)
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
