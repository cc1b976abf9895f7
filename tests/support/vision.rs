//! How vision models' processors count an image's prompt tokens, as the
//! mock upstreams count them and as the gateway's bound of them is
//! checked against (`src/metering/image.rs` includes this file in its
//! tests).

/// A vision model's processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vision {
    Llama4,
    Qwen25Vl,
}

impl Vision {
    /// The prompt tokens of a `width` × `height` image.
    pub fn image_tokens(self, width: usize, height: usize) -> u64 {
        self.image_tokens_within(width, height, None)
    }

    /// `image_tokens`, with the processor's most pixels as a request's
    /// `mm_processor_kwargs` may set them (Qwen 2.5 VL's `max_pixels`).
    pub fn image_tokens_within(self, width: usize, height: usize, max_pixels: Option<f64>) -> u64 {
        match self {
            Self::Llama4 => llama4_image_tokens(width, height),
            Self::Qwen25Vl => qwen25_vl_image_tokens(width, height, max_pixels),
        }
    }
}

/// Llama 4's image processor (Hugging Face's `Llama4ImageProcessor` and
/// `Llama4Processor`): of the canvases of 336-pixel tiles, at most 16,
/// the one the image fits with the least upscaling, else the least
/// downscaling, the smaller on a tie; 144 tokens a tile, a separator
/// after each, and a global view of 144 between three markers.
fn llama4_image_tokens(width: usize, height: usize) -> u64 {
    let canvases: Vec<(usize, usize)> = (1..=16)
        .flat_map(|rows| (1..=16 / rows).map(move |columns| (rows, columns)))
        .collect();
    // In float32, as the processor's tensors compute it.
    let scale = |&(rows, columns): &(usize, usize)| {
        f32::min(
            (rows * 336) as f32 / height as f32,
            (columns * 336) as f32 / width as f32,
        )
    };
    let scales = canvases.iter().map(scale);
    let chosen = scales
        .clone()
        .filter(|&s| s >= 1.0)
        .reduce(f32::min)
        .or_else(|| scales.reduce(f32::max))
        .expect("canvases");
    let (rows, columns) = canvases
        .iter()
        .filter(|c| scale(c) == chosen)
        .min_by_key(|(rows, columns)| rows * columns)
        .expect("the chosen scale's canvas");
    let tiles = (rows * columns) as u64;
    let tiled = if tiles > 1 { tiles * 145 } else { 0 };
    tiled + 147
}

/// Qwen 2.5 VL's image processor (`smart_resize` in Hugging Face's
/// `Qwen2VLImageProcessor`, with the model's `min_pixels` 3,136 and
/// `max_pixels` 12,845,056, or the request's): the image's sides rounded
/// to the nearest 28
/// pixels (to even, as Python rounds), an image over the most pixels
/// scaled down to fit, one under the least scaled up; a token for each 28
/// × 28 square (patches of 14 merged two by two), and two markers.
fn qwen25_vl_image_tokens(width: usize, height: usize, max_pixels: Option<f64>) -> u64 {
    const LEAST: f64 = 3_136.0;
    let most = max_pixels.unwrap_or(12_845_056.0);
    let (w, h) = (width as f64, height as f64);
    let steps = |side: f64| (side / 28.0).round_ties_even();
    let (mut across, mut down) = (steps(w), steps(h));
    if across * down * 784.0 > most {
        let beta = (w * h / most).sqrt();
        across = (w / beta / 28.0).floor().max(1.0);
        down = (h / beta / 28.0).floor().max(1.0);
    } else if across * down * 784.0 < LEAST {
        let beta = (LEAST / (w * h)).sqrt();
        across = (w * beta / 28.0).ceil();
        down = (h * beta / 28.0).ceil();
    }
    (across * down) as u64 + 2
}
