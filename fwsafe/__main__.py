from fwsafe.cli import main

main()
