"""`python -m service.cli COMMAND`: what the `task-runner` console script runs."""

from service.cli import main

main()
