from nodedev.cli import entry

entry()
