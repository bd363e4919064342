from streammerge.front.cli import main

main()
