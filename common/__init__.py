"""The ground floor: stage-free helpers every package may import; imports none of the project's packages
(ARCHITECTURE.md)."""
