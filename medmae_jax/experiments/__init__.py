"""Small, real reproductions of the paper's comparisons that run on a CPU (see each module's docstring)."""
