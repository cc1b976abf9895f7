//! An image's prompt tokens. The estimate is Llama 4's count: the image
//! is fitted to a canvas of 336-pixel tiles (at most 16), and each tile,
//! plus a global view of the whole image when there is more than one,
//! takes 144 tokens, with a separator after each tile and three markers
//! around them; never below the processor's count, which picks the
//! smallest canvas the image fits without downscaling. The most is the
//! larger of that and Qwen 2.5 VL's count, which grows with the image's
//! pixels, to 16,384 tokens: the most the common vision models' processors
//! (Llama 4, Qwen 2.5 VL, Gemma 3, Pixtral) make of one image, which a
//! budget reserves. An image whose size cannot be read from the request
//! (a URL the upstream fetches itself) takes the most of each.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::prompt::PromptTokens;

const TILE_PIXELS: usize = 336;
const MAX_TILES: u64 = 16;
/// 24 × 24 patches of 14 pixels, pixel-shuffled four to one.
const TOKENS_PER_TILE: u64 = 144;
/// `<|image_start|>`, `<|image|>`, `<|image_end|>`.
const MARKERS: u64 = 3;
/// Qwen 2.5 VL's processor resizes an image to sides in steps of 28
/// pixels (patches of 14, merged two by two into a token) and to between
/// these many pixels (its `min_pixels` and `max_pixels`).
const QWEN_STEP: f64 = 28.0;
const QWEN_MIN_PIXELS: f64 = 3_136.0;
const QWEN_MOST: u64 = 12_845_056 / (28 * 28);
/// `<|vision_start|>`, `<|vision_end|>`.
const QWEN_MARKERS: u64 = 2;
/// Base64 characters decoded first: a PNG, GIF or WebP header, or a JPEG's
/// frame header when no large metadata comes before it.
const HEAD_CHARS: usize = 4096;

/// The most tokens Llama 4 makes of any image.
pub const LLAMA4_MOST: u64 = tokens_for_tiles(MAX_TILES);

/// The tokens of the image at `url`: a data URL's image is read for its
/// size; anything else takes the most an image can.
pub fn tokens(url: &str) -> PromptTokens {
    match size(url) {
        Some((width, height)) => {
            let tiles = (width.div_ceil(TILE_PIXELS) * height.div_ceil(TILE_PIXELS)) as u64;
            let llama4 = tokens_for_tiles(tiles.clamp(1, MAX_TILES));
            PromptTokens {
                estimate: llama4,
                most: llama4.max(qwen_at_most(width, height)),
            }
        }
        None => PromptTokens {
            estimate: LLAMA4_MOST,
            most: LLAMA4_MOST.max(QWEN_MOST + QWEN_MARKERS),
        },
    }
}

const fn tokens_for_tiles(tiles: u64) -> u64 {
    let global = TOKENS_PER_TILE + MARKERS;
    if tiles == 1 {
        global
    } else {
        tiles * (TOKENS_PER_TILE + 1) + global
    }
}

/// At least Qwen 2.5 VL's count of a `width` × `height` image: its sides
/// rounded up to steps of 28 where the processor rounds them to the
/// nearest, scaled up as it scales an image of fewer than its least
/// pixels, and at most its largest image.
fn qwen_at_most(width: usize, height: usize) -> u64 {
    let (width, height) = (width.max(1) as f64, height.max(1) as f64);
    let scale = (QWEN_MIN_PIXELS / (width * height)).sqrt().max(1.0);
    let steps = |side: f64| (side * scale / QWEN_STEP).ceil() as u64;
    (steps(width) * steps(height)).min(QWEN_MOST) + QWEN_MARKERS
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
#[path = "../../tests/support/vision.rs"]
mod vision;

#[cfg(test)]
mod tests {
    use super::vision::Vision;
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

    fn estimate(url: &str) -> u64 {
        tokens(url).estimate
    }

    #[test]
    fn an_image_is_estimated_at_its_tiles_and_a_global_view() {
        assert_eq!(estimate(&png(336, 336)), 147, "one tile is the whole image");
        assert_eq!(estimate(&png(1, 1)), 147);
        assert_eq!(estimate(&png(337, 336)), 2 * 145 + 147);
        assert_eq!(estimate(&png(1344, 1344)), 16 * 145 + 147);
        assert_eq!(estimate(&png(5000, 100)), 15 * 145 + 147);
        assert_eq!(estimate(&png(8000, 6000)), LLAMA4_MOST, "downscaled to 16");
        assert_eq!(LLAMA4_MOST, 2467);
    }

    #[test]
    fn an_image_is_never_below_llama_4s_count_nor_at_most_below_qwen_25_vls() {
        let mut rng = fastrand::Rng::with_seed(25);
        let sides = [
            1, 13, 14, 27, 28, 29, 41, 42, 56, 300, 336, 1344, 3584, 4000, 8000,
        ];
        let mut sizes: Vec<(usize, usize)> = sides
            .iter()
            .flat_map(|&w| sides.iter().map(move |&h| (w, h)))
            .collect();
        sizes.extend((0..20_000).map(|_| (rng.usize(1..9_000), rng.usize(1..9_000))));
        for (width, height) in sizes {
            // The processor refuses sides more than 200 times apart.
            if width.max(height) > 200 * width.min(height) {
                continue;
            }
            let counted = tokens(&png(width as u32, height as u32));
            let llama4 = Vision::Llama4.image_tokens(width, height);
            let real = Vision::Qwen25Vl.image_tokens(width, height);
            assert!(
                counted.estimate >= llama4 && counted.most >= real.max(counted.estimate),
                "{width} × {height}: {counted:?}, Llama 4 counts {llama4}, Qwen {real}"
            );
            // Within a step of each side of Qwen's count, or Llama 4's.
            let slack = (width / 28 + height / 28 + 3) as u64;
            assert!(
                counted.most <= (real + slack).max(counted.estimate),
                "{width} × {height}: {counted:?}, Qwen counts {real}"
            );
        }
        // A 12-megapixel photo: 2,467 tokens to Llama 4, 15,303 to Qwen.
        assert_eq!(Vision::Qwen25Vl.image_tokens(4000, 3000), 15_303);
        assert_eq!(tokens(&png(4000, 3000)).most, 143 * 108 + 2);
    }

    #[test]
    fn a_jpeg_is_read_past_its_metadata() {
        assert_eq!(estimate(&jpeg(700, 300, 100)), 3 * 145 + 147);
        assert_eq!(estimate(&jpeg(700, 300, 60_000)), 3 * 145 + 147);
    }

    #[test]
    fn an_image_of_unknown_size_takes_the_most() {
        let most = PromptTokens {
            estimate: LLAMA4_MOST,
            most: 16_384 + 2,
        };
        assert_eq!(tokens("https://example.com/cat.png"), most);
        assert_eq!(tokens("data:image/png;base64,not base64"), most);
        assert_eq!(tokens("data:image/png;base64,AAAA"), most);
        assert_eq!(tokens(""), most);
        let plain = png(10, 10).replace(";base64", "");
        assert_eq!(tokens(&plain), most);
    }
}
