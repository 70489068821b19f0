//! Harness for end-to-end tests of the caregate binary.
