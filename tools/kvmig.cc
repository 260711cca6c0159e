#include "cli.h"

int main(int argc, char** argv) { return kvmig::run_cli(argc, argv); }
