"""The site gateway agent (see docs/architecture.md, sections 2 and 5)."""
