//! Logging from a plugin through the host's tracing subscriber. Natively (in
//! fixture tests) lines go to stderr.

#[cfg(target_arch = "wasm32")]
use crate::wit::kuwa::controller::log::{Level, log};

macro_rules! level_fn {
    ($name:ident, $level:ident) => {
        #[doc = concat!("Logs `message` at ", stringify!($name), " level.")]
        pub fn $name(message: &str) {
            #[cfg(target_arch = "wasm32")]
            log(Level::$level, message);
            #[cfg(not(target_arch = "wasm32"))]
            eprintln!("[{}] {message}", stringify!($name));
        }
    };
}

level_fn!(trace, Trace);
level_fn!(debug, Debug);
level_fn!(info, Info);
level_fn!(warn, Warn);
level_fn!(error, Error);
