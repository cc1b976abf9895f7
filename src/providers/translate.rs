//! What the translating providers (Bedrock, TGI's generate API) share: the
//! machinery that turns an upstream's own stream of events into OpenAI
//! chunks.

use std::collections::VecDeque;

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};

use super::{Chunk, ChunkStream};
use crate::error::GatewayError;

pub type Chunks = Vec<Result<Chunk, GatewayError>>;

/// Turns the events of one upstream stream into OpenAI chunks.
pub trait ChunkMapper: Send + 'static {
    type Event: Send + 'static;

    /// The chunks (or the error) one upstream event becomes; may be none.
    fn map(&mut self, event: Self::Event, out: &mut Chunks);

    /// The upstream ended: an error if it ended before its last event.
    fn end(&mut self) -> Result<(), GatewayError>;
}

/// The chunk stream of `events` through `mapper`. It ends after the first
/// error, which is its last item.
pub fn map_chunks<M: ChunkMapper>(
    events: BoxStream<'static, Result<M::Event, GatewayError>>,
    mapper: M,
) -> ChunkStream {
    struct State<M: ChunkMapper> {
        events: BoxStream<'static, Result<M::Event, GatewayError>>,
        mapper: M,
        pending: VecDeque<Result<Chunk, GatewayError>>,
        done: bool,
    }
    let state = State {
        events,
        mapper,
        pending: VecDeque::new(),
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.pending.pop_front() {
                if item.is_err() {
                    s.pending.clear();
                    s.done = true;
                }
                return Some((item, s));
            }
            if s.done {
                return None;
            }
            match s.events.next().await {
                Some(Ok(event)) => {
                    let mut out = Vec::new();
                    s.mapper.map(event, &mut out);
                    s.pending.extend(out);
                }
                Some(Err(error)) => s.pending.push_back(Err(error)),
                None => {
                    s.done = true;
                    if let Err(error) = s.mapper.end() {
                        s.pending.push_back(Err(error));
                    }
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles each number; an odd one is an error; ending needs a 0 seen.
    struct Doubler {
        saw_zero: bool,
    }

    impl ChunkMapper for Doubler {
        type Event = u32;

        fn map(&mut self, n: u32, out: &mut Chunks) {
            self.saw_zero |= n == 0;
            if n % 2 == 1 {
                out.push(Err(GatewayError::internal("odd")));
            } else {
                out.push(Ok(n.to_string().into()));
                out.push(Ok(n.to_string().into()));
            }
        }

        fn end(&mut self) -> Result<(), GatewayError> {
            if self.saw_zero {
                Ok(())
            } else {
                Err(GatewayError::internal("no zero"))
            }
        }
    }

    async fn run(events: Vec<u32>) -> Vec<Result<String, String>> {
        let events = stream::iter(events.into_iter().map(Ok)).boxed();
        map_chunks(events, Doubler { saw_zero: false })
            .map(|r| {
                r.map(|b| String::from_utf8(b.to_vec()).unwrap())
                    .map_err(|e| e.message().to_owned())
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn maps_each_event_and_stops_at_the_first_error() {
        let ok = |s: &str| Ok(s.to_owned());
        assert_eq!(run(vec![2, 0]).await, [ok("2"), ok("2"), ok("0"), ok("0")]);
        assert_eq!(
            run(vec![2, 3, 0]).await,
            [ok("2"), ok("2"), Err("odd".into())]
        );
        assert_eq!(
            run(vec![2]).await,
            [ok("2"), ok("2"), Err("no zero".into())]
        );
    }
}
