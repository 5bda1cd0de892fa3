"""The message bus contract and plumbing (see docs/architecture.md, section 3)."""
