from csdkit.cli import main

main()
