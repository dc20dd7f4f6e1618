"""Data loading for HashAudit: image sets, loaders, mosaics, protocol splits and transforms.

Every loader returns an :class:`ImageSet` whose items are ``float32`` images ``(C, H, W)`` in
``[0, 1]`` with ``float32`` multi-hot labels.
"""

from service.data.base import (
    CHANNEL_MODES,
    ArrayImageSet,
    FileImageSet,
    ImageSet,
    IndexLike,
    as_index_array,
    decode_image,
)
from service.data.deephash_list import load_deephash_list
from service.data.fashion_mnist import (
    DEFAULT_FMNIST_DIR,
    FMNIST_CLASS_NAMES,
    FMNIST_ENV_VAR,
    FMNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    default_fmnist_dir,
    find_idx_file,
    load_fashion_mnist,
    read_idx,
)
from service.data.image_folder import IMAGE_EXTENSIONS, load_image_folder
from service.data.mosaic import MosaicImageSet, make_mosaic_set
from service.data.splits import SPLITS_PROTOCOL, Splits, SplitSpec, index_digest, make_splits
from service.data.transforms import random_shift_flip, to_float, to_uint8

__all__ = [
    "CHANNEL_MODES",
    "DEFAULT_FMNIST_DIR",
    "FMNIST_CLASS_NAMES",
    "FMNIST_ENV_VAR",
    "FMNIST_FILES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_EXTENSIONS",
    "SPLITS_PROTOCOL",
    "ArrayImageSet",
    "FileImageSet",
    "ImageSet",
    "IndexLike",
    "MosaicImageSet",
    "SplitSpec",
    "Splits",
    "as_index_array",
    "decode_image",
    "default_fmnist_dir",
    "find_idx_file",
    "index_digest",
    "load_deephash_list",
    "load_fashion_mnist",
    "load_image_folder",
    "make_mosaic_set",
    "make_splits",
    "random_shift_flip",
    "read_idx",
    "to_float",
    "to_uint8",
]
