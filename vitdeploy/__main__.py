"""`python -m vitdeploy` behaves exactly like the `vitdeploy` console script."""

from vitdeploy.cli import main

if __name__ == "__main__":
    main()
