"""Default data config: every field the data package reads, with its default."""

import ml_collections

from lpt_jax.errors import DataError

CORRUPT_POLICIES = ("fail", "skip")
FORMATS = ("auto", "files", "prepared")
IB_SAMPLING = ("epoch_permutation", "independent")  # data.ib_sampling, see sampling.py


def default_config() -> ml_collections.ConfigDict:
    """Returns the data config with defaults (Places-LT at 224 px)."""
    c = ml_collections.ConfigDict()
    c.name = "places_lt"  # registry key, see `registered_sources()`
    # Where images live: the image root of a split list, an image_folder tree, or a
    # prepared directory (`python -m lpt_jax.data.prepare`). '' = none. Local or gs://.
    c.root = ""
    c.format = "auto"  # 'auto' (prepared if root holds lpt_prepared.json) | 'files' | 'prepared'
    c.split_dir = ""  # folder with the split lists; '' = the lists shipped in the package
    c.train_list = ""  # explicit list files override split_dir
    c.val_list = ""
    c.test_list = ""
    c.class_names_file = ""  # image_folder with lists: one name per line (optional)
    c.num_classes = 0  # image_folder with lists and no names file: 0 = max label + 1
    c.check_files = True  # stat the first file of every split before training
    # CIFAR-LT
    c.imbalance_ratio = 100
    c.cifar_lt_seed = 42  # NumPy legacy global seed of the reference subset
    # TFDS-backed sources
    c.tfds_name = ""  # '' = the source's default TFDS name
    c.tfds_data_dir = ""  # '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.download = False  # never download unless asked
    c.download_retries = 3  # HTTP retries per file (TFDS's own 10 take ~3.5 min offline)
    c.cache_dir = ""  # label-scan cache for big TFDS sources; '' = <tfds data dir>/lpt_jax_cache
    # Preprocessing
    c.image_size = 224
    c.resize_size = 256
    c.antialias = True  # PIL-style (antialiased) bilinear, as the PyTorch reference
    c.jpeg_fast_crop = True  # decode only the crop window of a JPEG (faster; same pixels
    #   except a few border pixels, by a few levels, from chroma upsampling)
    # Streams
    c.cb_images_per_class = 4
    # Instance-balanced batch: 'epoch_permutation' = every image once per epoch (ours);
    # 'independent' = each step draws B distinct images on its own (the release rebuilds
    # a shuffled loader every step: ~63 % of the images seen per epoch).
    c.ib_sampling = "epoch_permutation"
    c.corrupt_images = "fail"  # 'fail' | 'skip' (substitute / mask, with a warning)
    c.num_parallel_calls = -1  # -1 = tf.data.AUTOTUNE
    c.prefetch = 2  # batches
    c.tf_threads = 0  # tf.data private thread pool size; 0 = TF's shared pool
    return c


def check_config(cfg) -> None:
    """Raises DataError for a field value no source can use."""
    if cfg.corrupt_images not in CORRUPT_POLICIES:
        raise DataError(
            f"data.corrupt_images={cfg.corrupt_images!r}; expected one of {CORRUPT_POLICIES}")
    if cfg.get("ib_sampling", IB_SAMPLING[0]) not in IB_SAMPLING:
        raise DataError(f"data.ib_sampling={cfg.ib_sampling!r}; expected one of {IB_SAMPLING}")
    if cfg.format not in FORMATS:
        raise DataError(f"data.format={cfg.format!r}; expected one of {FORMATS}")
    if not 0 < cfg.image_size <= cfg.resize_size:
        raise DataError(
            f"data.image_size={cfg.image_size} must be in (0, data.resize_size={cfg.resize_size}]")
    retries = cfg.get("download_retries", 0)
    if not isinstance(retries, int) or retries < 0:
        raise DataError(f"data.download_retries={retries!r} must be an integer >= 0")
    if cfg.cb_images_per_class < 1:
        raise DataError(f"data.cb_images_per_class={cfg.cb_images_per_class} must be >= 1")
