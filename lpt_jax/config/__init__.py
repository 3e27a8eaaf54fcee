"""Config fields declared once (`fields`) and the tree of sections a run reads, with every
check, role and help text derived from it (`schema`)."""
