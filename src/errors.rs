//! How an error reads on one line: its own message, then each cause's, as
//! `failed to read `x`: permission denied` (errors keep their sources; this
//! is the one place that prints the chain).

use std::error::Error;

/// The error and its causes joined by `: `; a cause whose text the message
/// already ends with (a transparent wrapper) is not repeated.
pub fn with_causes(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read `{0}`")]
        Read(&'static str, #[source] std::io::Error),
        #[error(transparent)]
        Same(std::io::Error),
    }

    #[test]
    fn causes_are_joined_once() {
        let io = || std::io::Error::other("permission denied");
        assert_eq!(
            with_causes(&Outer::Read("x", io())),
            "cannot read `x`: permission denied"
        );
        assert_eq!(with_causes(&Outer::Same(io())), "permission denied");
    }
}
