"""Chat commands: parsing, roles, confirmation and the handlers themselves."""
