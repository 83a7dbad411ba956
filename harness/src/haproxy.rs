//! HAProxy in master-worker mode (written with the proxyctl issue).
