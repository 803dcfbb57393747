//! The WebSocket wire, below the relay: frames read as they pass ([`frame`]), one peer of a
//! connection with its socket and buffers ([`leg`]), the socket type both peers share
//! ([`io`]), and every close the edge sends with the reasons behind it ([`close`]).

pub(crate) mod close;
pub(crate) mod frame;
pub(crate) mod io;
pub(crate) mod leg;
