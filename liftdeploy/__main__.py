"""`python -m liftdeploy`: the same CLI as the `liftdeploy` script."""

from .cli import main

main()
