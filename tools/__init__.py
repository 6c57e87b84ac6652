"""Project tooling: generators and checks run by the Makefile, not shipped."""
