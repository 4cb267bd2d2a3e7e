from hps_exp.app import main

main()
