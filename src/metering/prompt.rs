//! A prompt's tokens: the estimate, and the most a tokenizer and chat
//! template can make of it (`estimate` and `image` count them).

/// A prompt's estimated tokens, and the most it can be: `u64::MAX` where
/// the request does not bound it (a video), as a deployment's context
/// window then does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptTokens {
    pub estimate: u64,
    pub most: u64,
}

impl std::ops::Add for PromptTokens {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            estimate: self.estimate.saturating_add(other.estimate),
            most: self.most.saturating_add(other.most),
        }
    }
}

impl std::ops::AddAssign for PromptTokens {
    fn add_assign(&mut self, other: Self) {
        *self = *self + other;
    }
}

impl std::iter::Sum for PromptTokens {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |sum, t| sum + t)
    }
}
