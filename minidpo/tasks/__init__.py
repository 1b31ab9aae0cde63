"""Self-contained tasks with a ground-truth reward (nothing downloaded at run time)."""
