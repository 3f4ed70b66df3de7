from ticketflow.cli import main

main()
