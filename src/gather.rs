//! A whole body gathered into one buffer, as the gateway reads a client's
//! request and an upstream's answer that is not streamed. Most bodies come
//! in one frame, which is kept as it came. One that comes in several is
//! kept as its frames until a quarter of the length it declared has come,
//! then copied into a buffer of that length, so that a large body is held
//! about once, not in its frames and then again in a copy of them all;
//! waiting for that quarter keeps a sender that declares a large body and
//! sends little from making the gateway reserve much. A body that declared
//! no length is copied into one buffer at its end: a buffer grown as it
//! goes would hold more at its peak, as the allocator keeps each buffer it
//! outgrew for a while.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;

/// The data of `body`, which says it is `declared` bytes long (0 when it
/// does not say): read to its end, or to its first error.
pub async fn gather<B>(body: B, declared: u64) -> Result<Bytes, B::Error>
where
    B: Body<Data = Bytes>,
{
    let declared = usize::try_from(declared).unwrap_or(0);
    let mut body = std::pin::pin!(body);
    let mut gathered = Gathered::Nothing;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            gathered = gathered.add(data, declared);
        }
    }
    Ok(match gathered {
        Gathered::Nothing => Bytes::new(),
        Gathered::One(data) => data,
        Gathered::Frames(frames, length) => joined(&frames, length).freeze(),
        Gathered::Sized(all) => all.freeze(),
    })
}

enum Gathered {
    Nothing,
    One(Bytes),
    /// The frames so far, and their length.
    Frames(Vec<Bytes>, usize),
    /// The body so far, in a buffer of its declared length.
    Sized(BytesMut),
}

impl Gathered {
    fn add(self, data: Bytes, declared: usize) -> Self {
        match self {
            Self::Nothing => Self::One(data),
            Self::One(first) => {
                let length = first.len();
                Self::Frames(vec![first], length).add(data, declared)
            }
            Self::Frames(mut frames, mut length) => {
                length += data.len();
                frames.push(data);
                if declared > 0 && length >= declared / 4 {
                    return Self::Sized(joined(&frames, declared.max(length)));
                }
                Self::Frames(frames, length)
            }
            Self::Sized(mut all) => {
                all.extend_from_slice(&data);
                Self::Sized(all)
            }
        }
    }
}

/// `frames` copied into one buffer of `capacity` bytes.
fn joined(frames: &[Bytes], capacity: usize) -> BytesMut {
    let mut all = BytesMut::with_capacity(capacity);
    frames.iter().for_each(|frame| all.extend_from_slice(frame));
    all
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures_util::stream;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::*;

    fn body(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = Infallible> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::from_static(part))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn one_frame_is_kept_as_it_came_and_several_are_joined_in_order() {
        let one: &'static [u8] = b"{\"whole\":true}";
        let gathered = gather(body(&[one]), 14).await.unwrap();
        assert_eq!(gathered.as_ptr(), one.as_ptr(), "not copied");
        for declared in [0, 9, 1 << 20] {
            let gathered = gather(body(&[b"ab", b"", b"cde", b"f"]), declared).await;
            assert_eq!(&gathered.unwrap()[..], b"abcdef");
        }
        assert!(gather(body(&[]), 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_declared_length_sizes_the_buffer_once_a_quarter_of_it_has_come() {
        let capacity = |gathered: Bytes| {
            let all: BytesMut = gathered.try_into_mut().expect("the only reference");
            all.capacity()
        };
        let gathered = gather(body(&[b"ab", b"cd", b"efghijkl", b"mnop"]), 16).await;
        let gathered = gathered.unwrap();
        assert_eq!(&gathered[..], b"abcdefghijklmnop");
        assert_eq!(capacity(gathered), 16);
        // Declared large and sent small: nothing reserved for what never came.
        let gathered = gather(body(&[b"ab", b"cd"]), 1 << 30).await.unwrap();
        assert_eq!(&gathered[..], b"abcd");
        assert_eq!(capacity(gathered), 4);
    }
}
