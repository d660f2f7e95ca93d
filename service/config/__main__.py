"""`python -m service.config > docs/configuration.md` regenerates the settings page."""

from service.config.docs import main

main()
