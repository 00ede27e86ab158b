//! A chosen and a rejected value that travel together.

/// The chosen and the rejected half of a preference pair (or of a batch of pairs).
///
/// Keeping both halves in one value means they cannot be swapped by argument order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChosenRejected<T> {
    /// The preferred response.
    pub chosen: T,
    /// The dispreferred response.
    pub rejected: T,
}

impl<T> ChosenRejected<T> {
    /// Pairs two values.
    pub fn new(chosen: T, rejected: T) -> Self {
        Self { chosen, rejected }
    }

    /// Applies `f` to both halves, chosen first.
    pub fn map<U>(self, mut f: impl FnMut(T) -> U) -> ChosenRejected<U> {
        ChosenRejected { chosen: f(self.chosen), rejected: f(self.rejected) }
    }

    /// Borrows both halves.
    pub fn as_ref(&self) -> ChosenRejected<&T> {
        ChosenRejected { chosen: &self.chosen, rejected: &self.rejected }
    }

    /// Combines two pairs half by half.
    pub fn zip<U>(self, other: ChosenRejected<U>) -> ChosenRejected<(T, U)> {
        ChosenRejected {
            chosen: (self.chosen, other.chosen),
            rejected: (self.rejected, other.rejected),
        }
    }
}

impl<T, E> ChosenRejected<std::result::Result<T, E>> {
    /// Turns a pair of results into a result of a pair; the chosen error wins.
    pub fn transpose(self) -> std::result::Result<ChosenRejected<T>, E> {
        Ok(ChosenRejected { chosen: self.chosen?, rejected: self.rejected? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_as_ref_zip_and_transpose_keep_the_halves_apart() {
        let pair = ChosenRejected::new(2, 3);
        assert_eq!(pair.map(|x| x * 10), ChosenRejected::new(20, 30));
        assert_eq!(pair.as_ref().map(|x| *x + 1), ChosenRejected::new(3, 4));
        assert_eq!(
            pair.zip(ChosenRejected::new('a', 'b')),
            ChosenRejected::new((2, 'a'), (3, 'b'))
        );

        let ok: ChosenRejected<Result<i32, &str>> = ChosenRejected::new(Ok(1), Ok(2));
        assert_eq!(ok.transpose(), Ok(ChosenRejected::new(1, 2)));
        let bad: ChosenRejected<Result<i32, &str>> = ChosenRejected::new(Err("c"), Err("r"));
        assert_eq!(bad.transpose(), Err("c"));
    }
}
