"""Task bundle format and mask stores (no torch needed)."""

from mask_store.errors import (
    BackboneMismatch,
    BundleInvalid,
    BundleTooLarge,
    BundleUnsupported,
    InvalidTaskName,
    MaskStoreError,
    StoredBundleCorrupt,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
)
from mask_store.format import Bundle, BundleHeader, decode_bundle, decode_header, encode_bundle, pack_mask, unpack_mask
from mask_store.local import LocalMaskStore

__all__ = [
    "BackboneMismatch",
    "Bundle",
    "BundleHeader",
    "BundleInvalid",
    "BundleTooLarge",
    "BundleUnsupported",
    "InvalidTaskName",
    "LocalMaskStore",
    "MaskStoreError",
    "StoreFull",
    "StoreUnavailable",
    "StoredBundleCorrupt",
    "TaskNotFound",
    "decode_bundle",
    "decode_header",
    "encode_bundle",
    "pack_mask",
    "unpack_mask",
]
