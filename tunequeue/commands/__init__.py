"""One module per group of `tunequeue` commands; each handler takes the parsed arguments and returns an exit
code, or raises `Refused` with a message that says what to do."""
