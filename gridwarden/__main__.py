from gridwarden.cli import main

main()
