from fwsafe.entry import main

main()
