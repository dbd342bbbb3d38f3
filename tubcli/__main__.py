from tubcli.cli import main

main()
