//! An image's prompt tokens, as Llama 4's image processor counts them: the
//! image is fitted to a canvas of 336-pixel tiles (at most 16), and each
//! tile, plus a global view of the whole image when there is more than
//! one, takes 144 tokens, with a separator after each tile and three
//! markers around them. The count is an upper bound: the processor picks
//! the smallest canvas the image fits without downscaling, and that is
//! never more tiles than the image's sides need in 336-pixel steps.
//! An image whose size cannot be read from the request (a URL the
//! upstream fetches itself) is reserved as the largest canvas.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

const TILE_PIXELS: usize = 336;
const MAX_TILES: u64 = 16;
/// 24 × 24 patches of 14 pixels, pixel-shuffled four to one.
const TOKENS_PER_TILE: u64 = 144;
/// `<|image_start|>`, `<|image|>`, `<|image_end|>`.
const MARKERS: u64 = 3;
/// Base64 characters decoded first: a PNG, GIF or WebP header, or a JPEG's
/// frame header when no large metadata comes before it.
const HEAD_CHARS: usize = 4096;

/// The most tokens any image takes.
pub const MOST_TOKENS: u64 = tokens_for_tiles(MAX_TILES);

/// The tokens of the image at `url`: a data URL's image is read for its
/// size; anything else takes the most an image can.
pub fn tokens(url: &str) -> u64 {
    size(url).map_or(MOST_TOKENS, |(width, height)| {
        let tiles = (width.div_ceil(TILE_PIXELS) * height.div_ceil(TILE_PIXELS)) as u64;
        tokens_for_tiles(tiles.clamp(1, MAX_TILES))
    })
}

const fn tokens_for_tiles(tiles: u64) -> u64 {
    let global = TOKENS_PER_TILE + MARKERS;
    if tiles == 1 {
        global
    } else {
        tiles * (TOKENS_PER_TILE + 1) + global
    }
}

/// Width and height of a `data:<type>;base64,<data>` URL's image, read
/// from its first bytes, or from all of it when its header lies further.
fn size(url: &str) -> Option<(usize, usize)> {
    let (_, data) = url.strip_prefix("data:")?.split_once(";base64,")?;
    let data = data.trim();
    let read = |data: &str| {
        let bytes = BASE64.decode(data).ok()?;
        let size = imagesize::blob_size(&bytes).ok()?;
        Some((size.width, size.height))
    };
    data.get(..HEAD_CHARS).and_then(read).or_else(|| read(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> String {
        let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        bytes.extend(width.to_be_bytes());
        bytes.extend(height.to_be_bytes());
        bytes.extend(b"\x08\x06\0\0\0\0\0\0\0");
        format!("data:image/png;base64,{}", BASE64.encode(bytes))
    }

    /// A JPEG whose frame header comes after `metadata` bytes of an APP1
    /// segment, as a camera's EXIF block puts it.
    fn jpeg(width: u16, height: u16, metadata: usize) -> String {
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xE1];
        bytes.extend(((metadata + 2) as u16).to_be_bytes());
        bytes.extend(std::iter::repeat_n(0u8, metadata));
        bytes.extend([0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend(height.to_be_bytes());
        bytes.extend(width.to_be_bytes());
        bytes.extend([0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01]);
        bytes.extend([0xFF, 0xD9]);
        format!("data:image/jpeg;base64,{}", BASE64.encode(bytes))
    }

    #[test]
    fn an_image_takes_its_tiles_and_a_global_view() {
        assert_eq!(tokens(&png(336, 336)), 147, "one tile is the whole image");
        assert_eq!(tokens(&png(1, 1)), 147);
        assert_eq!(tokens(&png(337, 336)), 2 * 145 + 147);
        assert_eq!(tokens(&png(1344, 1344)), 16 * 145 + 147);
        assert_eq!(tokens(&png(5000, 100)), 15 * 145 + 147);
        assert_eq!(tokens(&png(8000, 6000)), MOST_TOKENS, "downscaled to 16");
        assert_eq!(MOST_TOKENS, 2467);
    }

    #[test]
    fn a_jpeg_is_read_past_its_metadata() {
        assert_eq!(tokens(&jpeg(700, 300, 100)), 3 * 145 + 147);
        assert_eq!(tokens(&jpeg(700, 300, 60_000)), 3 * 145 + 147);
    }

    #[test]
    fn an_image_of_unknown_size_takes_the_most() {
        assert_eq!(tokens("https://example.com/cat.png"), MOST_TOKENS);
        assert_eq!(tokens("data:image/png;base64,not base64"), MOST_TOKENS);
        assert_eq!(tokens("data:image/png;base64,AAAA"), MOST_TOKENS);
        assert_eq!(tokens(""), MOST_TOKENS);
        let plain = png(10, 10).replace(";base64", "");
        assert_eq!(tokens(&plain), MOST_TOKENS);
    }
}
