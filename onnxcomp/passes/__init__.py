"""Graph passes, one job each; they never print, they append to a Report."""
