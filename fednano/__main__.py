from fednano.cli import main

main()
