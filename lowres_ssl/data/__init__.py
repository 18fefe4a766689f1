"""Images in, uint8 batches on the device out: folders, decoding, bad files, caches, datasets."""

from lowres_ssl.data.builtin import SIZES as DATASET_SIZES
from lowres_ssl.data.builtin import SPLITS as DATASETS
from lowres_ssl.data.builtin import dataset_size, dataset_spec, load_builtin
from lowres_ssl.data.cache import (
    ArrayImages,
    build_disk_cache,
    cache_path,
    default_cache_dir,
    load_disk_cache,
)
from lowres_ssl.data.folders import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    IMAGE_EXTENSIONS,
    BadImage,
    FileList,
    FolderImages,
    Skip,
    SkipLog,
    decode_image,
    scan_folder,
    scan_labeled,
)
from lowres_ssl.data.loader import (
    CACHE_CHOICES,
    Batch,
    EpochOrder,
    ImageLoader,
    default_num_workers,
    make_loader,
    open_images,
)

__all__ = [
    "CACHE_CHOICES",
    "DATASETS",
    "DATASET_SIZES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "BadImage",
    "Batch",
    "EpochOrder",
    "FileList",
    "FolderImages",
    "ImageLoader",
    "Skip",
    "SkipLog",
    "build_disk_cache",
    "cache_path",
    "dataset_size",
    "dataset_spec",
    "decode_image",
    "default_cache_dir",
    "default_num_workers",
    "load_builtin",
    "load_disk_cache",
    "make_loader",
    "open_images",
    "scan_folder",
    "scan_labeled",
]
