"""The `data` config section: every field the data package reads, declared once with its
default, what it accepts, its doc and its roles (lpt_jax.config.fields). TensorFlow-free."""

import ml_collections

from lpt_jax.config import fields as f
from lpt_jax.config.fields import BATCHED, INCIDENTAL, LOCATION, TRAINING, Field
from lpt_jax.data.registry import registered_sources
from lpt_jax.errors import DataError


def _check_sizes(data, root) -> None:
    if not 0 < data.image_size <= data.resize_size:
        raise DataError(f"data.image_size={data.image_size} must be in (0, "
                        f"data.resize_size={data.resize_size}]", field="data.image_size")


def _where(doc):
    return Field("", doc, f.text(), LOCATION)


FIELDS = f.Section("the data set, its splits and the input pipeline", dict(
    name=Field("places_lt", "the data set (lpt_jax.data registry)", f.one_of(registered_sources)),
    root=_where("where images live: the image root of the split lists, an image_folder tree, "
                "or a prepared directory; local or gs://"),
    format=Field("auto", "'auto' (prepared if root holds lpt_prepared.json), 'files' or "
                 "'prepared'", f.one_of("auto", "files", "prepared")),
    split_dir=_where("folder of the split lists ('' = the lists shipped in the package)"),
    train_list=_where("the train list (overrides split_dir)"),
    val_list=_where("the val list (overrides split_dir)"),
    test_list=_where("the test list (overrides split_dir)"),
    class_names_file=_where("image_folder with lists: one class name per line (optional)"),
    num_classes=Field(0, "image_folder with lists and no names file: the class count (0: the "
                      "largest label + 1)", f.integer(at_least=0)),
    check_files=Field(True, "stat the first file of every split before training",
                      f.boolean(), INCIDENTAL),
    imbalance_ratio=Field(100, "CIFAR-LT: n_max / n_min of the reference subset (100, 50, 10)",
                          f.integer(at_least=1)),
    cifar_lt_seed=Field(42, "CIFAR-LT: NumPy legacy global seed of the reference subset",
                        f.integer()),
    tfds_name=Field("", "TFDS-backed sources: the TFDS name ('' = the source's default)",
                    f.text()),
    tfds_data_dir=_where("TFDS data dir ('' = ~/tensorflow_datasets or $TFDS_DATA_DIR)"),
    download=Field(False, "download a TFDS data set that is not prepared (never otherwise)",
                   f.boolean(), INCIDENTAL),
    download_retries=Field(3, "HTTP retries per downloaded file (TFDS's own 10 take ~3.5 min "
                           "offline)", f.integer(at_least=0), INCIDENTAL),
    cache_dir=_where("label-scan cache of big TFDS sources ('' = <tfds data dir>/lpt_jax_cache)"),
    image_size=Field(224, "the training crop and evaluation size (the backbone's input)",
                     f.integer(at_least=1), BATCHED),
    resize_size=Field(256, "evaluation: the square resize before the centre crop",
                      f.integer(at_least=1)),
    antialias=Field(True, "PIL-style (antialiased) bilinear resizing, as the PyTorch reference",
                    f.boolean()),
    jpeg_fast_crop=Field(True, "training crops: decode only the crop window of a JPEG "
                         "(faster; a few border pixels differ by a few levels)", f.boolean(),
                         TRAINING),
    cb_images_per_class=Field(4, "class-balanced batch: consecutive images per visited class",
                              f.integer(at_least=1), TRAINING),
    ib_sampling=Field("epoch_permutation", "instance-balanced batch: 'epoch_permutation' (every "
                      "image once per epoch) or 'independent' (each step draws its batch on its "
                      "own, as the release's per-step loader: ~63 % of the images per epoch)",
                      f.one_of("epoch_permutation", "independent"), TRAINING),
    corrupt_images=Field("fail", "an unreadable image: 'fail' (name it and stop) or 'skip' "
                         "(substitute or mask it, counted)", f.one_of("fail", "skip")),
    num_parallel_calls=Field(-1, "tf.data parallel decodes (-1: AUTOTUNE)",
                             f.integer(at_least=-1), INCIDENTAL),
    prefetch=Field(2, "batches prefetched", f.integer(at_least=0), INCIDENTAL),
    tf_threads=Field(0, "tf.data private thread pool size (0: TF's shared pool)",
                     f.integer(at_least=0), INCIDENTAL)),
    rules=(_check_sizes,))


def default_config() -> ml_collections.ConfigDict:
    """The data section with its defaults (Places-LT at 224 px)."""
    return f.defaults_of(FIELDS)


def check_config(cfg) -> None:
    """Raises DataError for the first field value of the data section `cfg` that no source
    can use."""
    f.check_section(cfg, FIELDS, "data.", DataError)
