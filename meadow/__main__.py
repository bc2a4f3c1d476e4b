from meadow.cli import command_line

command_line()
