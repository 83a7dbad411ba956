//! Flotilla end-to-end test package; see tests/.
