"""The site gateway agent (see ../shared/design.md section 2)."""
