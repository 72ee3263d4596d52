//! Workspace-level tests for idem live in `tests/`.
