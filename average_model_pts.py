"""Paper-compatible front-end (not built yet: it says so and exits 2)."""

from comflp.not_built import refuse

if __name__ == "__main__":
    refuse("average_model_pts.py")
