"""``python -m nemt`` runs the command-line interface (the same as the ``nemt`` script)."""
from nemt.cli import app

if __name__ == "__main__":
    app(prog_name="nemt")
