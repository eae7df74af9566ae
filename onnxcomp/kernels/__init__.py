"""Pure array maths, no graphs: each function takes and returns numpy arrays."""
