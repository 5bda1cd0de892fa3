"""The message bus contract and plumbing (see ../shared/design.md section 4)."""
