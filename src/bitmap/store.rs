//! How bitmaps reach an image: the [`BitmapStore`] a format node implements (qcow2's bitmaps
//! extension), and what passes through it.

use super::BitmapError;

/// A bitmap as an image stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    pub granularity_bits: u32,
    /// The qcow2 `auto` flag: recording.
    pub recording: bool,
    /// `in_use` on disk, or the extension is not marked consistent.
    pub inconsistent: bool,
    /// The data (spec layout), for consistent bitmaps.
    pub data: Option<Vec<u8>>,
}

/// What to store for one bitmap.
#[derive(Clone, Copy, Debug)]
pub enum StoreData<'a> {
    /// New data, in the spec layout.
    Data(&'a [u8]),
    /// Keep the stored data as it is (a flags-only update).
    Keep,
}

/// One entry of the bitmap set to store.
#[derive(Clone, Copy, Debug)]
pub struct StoreEntry<'a> {
    pub name: &'a str,
    pub granularity_bits: u32,
    pub recording: bool,
    pub in_use: bool,
    pub data: StoreData<'a>,
}

/// Persistent storage of a node's bitmaps (the qcow2 bitmaps extension).
pub trait BitmapStore: Send + Sync {
    /// The bitmaps stored in the image. Ones vubd cannot use (unknown type, incompatible extra
    /// data) are not listed; the store keeps them untouched.
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>, BitmapError>;
    /// Make the stored set exactly `entries` (plus the unusable ones), durably.
    fn store_bitmaps(&self, entries: &[StoreEntry]) -> Result<(), BitmapError>;
    /// Why persistent bitmaps cannot be stored, if they cannot.
    fn cannot_store(&self) -> Option<String>;
    /// The image's cluster size (the default granularity).
    fn cluster_size(&self) -> u64;
}
