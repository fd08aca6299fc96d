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

impl<'a> StoreEntry<'a> {
    /// `bitmap` as stored: `in_use` if asked or inconsistent (an inconsistent bitmap stays
    /// flagged until it is removed), with `data`, or keeping what is stored.
    pub fn of(bitmap: &'a super::DirtyBitmap, in_use: bool, data: Option<&'a [u8]>) -> Self {
        StoreEntry {
            name: bitmap.name(),
            granularity_bits: bitmap.granularity_bits(),
            recording: bitmap.is_recording(),
            in_use: in_use || bitmap.is_inconsistent(),
            data: data.map_or(StoreData::Keep, StoreData::Data),
        }
    }
}

/// Persistent storage of a node's bitmaps (the qcow2 bitmaps extension).
pub trait BitmapStore: Send + Sync {
    /// The bitmaps stored in the image. Ones vubd cannot use (unknown type, incompatible extra
    /// data) are not listed; the store keeps them untouched.
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>, BitmapError>;
    /// Make the stored set exactly `entries` (plus the unusable ones), durably and atomically:
    /// a crash at any point leaves the old set or the new one. With `preallocate`, every data
    /// cluster of a recording bitmap is allocated (all-zero ones too), and the returned list
    /// gives, per entry, where its data clusters are, in order (empty for the others), for
    /// [`BitmapStore::write_data_cluster`].
    fn store_bitmaps(
        &self,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError>;
    /// Grow the disk to `disk_size` bytes and make the stored set exactly `entries` (their
    /// data sized for the new size) in the same atomic switch, so that no crash leaves
    /// bitmaps sized for one disk size in an image of another. Layouts as
    /// [`BitmapStore::store_bitmaps`].
    fn grow_with_bitmaps(
        &self,
        disk_size: u64,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError>;
    /// Write `data` in place inside one data cluster (one [`BitmapStore::store_bitmaps`]
    /// returned); durable once [`BitmapStore::sync_bitmaps`] returns.
    fn write_data_cluster(&self, offset: u64, data: &[u8]) -> Result<(), BitmapError>;
    /// Make the data clusters written so far durable.
    fn sync_bitmaps(&self) -> Result<(), BitmapError>;
    /// Why persistent bitmaps cannot be stored, if they cannot.
    fn cannot_store(&self) -> Option<String>;
    /// The image's cluster size (the default granularity).
    fn cluster_size(&self) -> u64;
}
