//! proxyctl library
