from shoalfs.cli.main import main

main()
